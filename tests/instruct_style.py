"""Rationales in the style instruct models write on GSM8K (Llama-3.x-Instruct: "## Step 1:" headers, bold,
`$`, units inside the expression, labels on the left, chains over lines that start with `=`), for the step
checker's tests. Test data only: written for the tests, not model output.

RATIONALES: (GSM8K test question index, gold answer, rationale) for the first 62 test questions, each with a
right final answer and right steps. LINES: single lines with their expected (steps true, steps found).
"""

RATIONALES = [
    (0, "18", """## Step 1: Calculate the number of eggs Janet uses each day.
Janet eats 3 eggs for breakfast and uses 4 eggs for muffins, so she uses 3 + 4 = 7 eggs per day.

## Step 2: Calculate the number of eggs left to sell.
Eggs left = 16 eggs - 7 eggs = 9 eggs.

## Step 3: Calculate how much she makes at the market.
9 eggs/day * $2/egg = $18/day.

The final answer is: $\\boxed{18}$"""),
    (1, "3", """Let's break it down step by step:

1. The robe takes 2 bolts of blue fiber.
2. It takes half that much white fiber, which is 2 / 2 = 1 bolt.
3. In total, the robe takes 2 + 1 = 3 bolts.

The final answer is 3."""),
    (2, "70000", """## Step 1: Calculate the total cost of the house.
Total cost = $80,000 + $50,000 = $130,000

## Step 2: Calculate the increase in value.
The value increased by 150% of the purchase price: 150% of $80,000 = 1.5 x $80,000 = $120,000

## Step 3: Calculate the new value of the house.
New value = $80,000 + $120,000 = $200,000

## Step 4: Calculate the profit.
Profit = $200,000 - $130,000 = $70,000

The final answer is: $\\boxed{70000}$"""),
    (3, "540", """James runs 3 sprints 3 times a week, so he runs 3 x 3 = 9 sprints a week.
Each sprint is 60 meters, so he runs 9 sprints x 60 meters/sprint = 540 meters a week.

The final answer is 540."""),
    (4, "20", """To find out how much feed Wendi needs for the final meal, we first need the total feed for the day.

**Step 1:** Total feed per day = 20 chickens × 3 cups/chicken = 60 cups

**Step 2:** Feed given so far = 15 cups + 25 cups = 40 cups

**Step 3:** Feed for the final meal = 60 cups - 40 cups = 20 cups

The final answer is 20."""),
    (5, "64", """## Step 1: Find the price of every second glass.
The discounted glass costs 60% of $5, which is 0.6 × $5 = $3.

## Step 2: Count the glasses at each price.
Kylar buys 16 glasses, so 16 / 2 = 8 glasses cost $5 and 8 glasses cost $3.

## Step 3: Calculate the total cost.
8 × $5 + 8 × $3 = $40 + $24 = $64

The final answer is: $\\boxed{64}$"""),
    (6, "260", """Let's start with Seattle, which has 20 sheep.

Charleston has 4 times as many sheep as Seattle:
Charleston = 4 × 20 = 80 sheep

Toulouse has twice as many sheep as Charleston:
Toulouse = 2 × 80 = 160 sheep

Together: 20 + 80 + 160 = 260 sheep

The final answer is 260."""),
    (7, "160", """## Step 1: Calculate how much of the file was downloaded before the restart.
40% of 200 GB = 0.4 x 200 GB = 80 GB

## Step 2: Calculate the time for the first 80 GB.
Time = 80 GB / 2 GB/minute = 40 minutes

## Step 3: Add the time for the restart.
The restart takes 20 minutes.

## Step 4: Calculate the time to download the whole file again.
Time = 200 GB / 2 GB/minute = 100 minutes

## Step 5: Add up all the times.
Total time = 40 minutes + 20 minutes + 100 minutes = 160 minutes

The final answer is: $\\boxed{160}$"""),
    (8, "45", """Let's break this down step by step:

1. John drives away from home for 3 hours at 60 mph:
Distance = 3 hours × 60 miles/hour = 180 miles

2. On the way back, he spends the first 2 hours in traffic, so he covers 0 miles.

3. He then drives for half an hour at 30 mph:
Distance = 0.5 hours × 30 miles/hour = 15 miles

4. The remaining time is 4 - 2 - 0.5 = 1.5 hours, at 80 mph:
Distance = 1.5 hours × 80 miles/hour = 120 miles

5. Total distance back toward home = 15 + 120 = 135 miles

6. Distance from home = 180 - 135 = 45 miles

The final answer is 45."""),
    (9, "460", """## Step 1: Calculate Eliza's regular earnings for the first 40 hours.
Regular earnings = 40 hours x $10/hour = $400

## Step 2: Calculate her overtime rate.
Overtime rate = 1.2 x $10 = $12 per hour

## Step 3: Calculate her overtime hours and pay.
Overtime hours = 45 - 40 = 5 hours
Overtime pay = 5 hours x $12/hour = $60

## Step 4: Calculate her total earnings.
Total earnings = $400 + $60 = $460

The final answer is: $\\boxed{460}$"""),
    (10, "366", """First month: 60 downloads.

Second month: three times as many as the first month, so 3 × 60 = 180 downloads.

Third month: reduced by 30% from the second month.
30% of 180 = 0.3 × 180 = 54
Third month = 180 - 54 = 126 downloads

Total downloads = 60 + 180 + 126 = 366

The final answer is 366."""),
    (11, "694", """Let's calculate the cost of each type of pastry:

* Donuts: 3 dozen x $68/dozen = $204
* Mini cupcakes: 2 dozen x $80/dozen = $160
* Mini cheesecakes: 6 dozen x $55/dozen = $330

Total cost: $204 + $160 + $330 = $694

The final answer is 694."""),
    (12, "13", """## Step 1: Calculate the money Carlos earns from the tree each year.
The tree grows 7 lemons a year, sold for $1.5 each: 7 lemons × $1.5/lemon = $10.50 per year.

## Step 2: Subtract the yearly cost of water and feed.
Net earnings per year = $10.50 - $3 = $7.50

## Step 3: Find how many years it takes to cover the $90 planting cost.
$90 / $7.50 per year = 12 years

After 12 years he has only earned back the cost, so he starts earning money in year 12 + 1 = 13.

The final answer is: $\\boxed{13}$"""),
    (13, "18", """Let's work backwards.

Melanie has 5 vacuum cleaners left after selling half of what was left at the orange house, so before the orange house she had 5 × 2 = 10.

Before selling 2 to the red house, she had 10 + 2 = 12.

She sold a third of her vacuum cleaners at the green house, so 12 is two-thirds of what she started with.
Start = 12 ÷ (2/3) = 18

The final answer is 18."""),
    (14, "60", """## Step 1: Calculate the number of students in contemporary dance.
20% of 20 students = 0.20 x 20 = 4 students

## Step 2: Calculate the remaining students.
Remaining students = 20 - 4 = 16 students

## Step 3: Calculate the number in jazz dance.
25% of 16 = 0.25 x 16 = 4 students

## Step 4: Calculate the number in hip-hop dance.
Hip-hop students = 16 - 4 = 12 students

## Step 5: Calculate the percentage in hip-hop dance.
(12 / 20) x 100% = 60%

The final answer is: $\\boxed{60}$"""),
    (15, "125", """Let's compare the two plans.

**Jewelry:** 2.5% of $5,000 = 0.025 × $5,000 = $125

**Electronic gadgets:** 1.2% of $8,000 = 0.012 × $8,000 = $96

The jewelry gives the larger profit: $125.

The final answer is 125."""),
    (16, "230", """Each train travels 80 miles on the first day and 150 miles on the second day.
Total distance per train = 80 miles + 150 miles = 230 miles.

The final answer is 230."""),
    (17, "57500", """## Step 1: Calculate Jill's weekly earnings as a teacher.
Teaching: 35 hours/week × $20/hour = $700/week

## Step 2: Calculate her weekly earnings as a coach.
Coaching: 15 hours/week × $30/hour = $450/week

## Step 3: Calculate her total weekly earnings.
$700 + $450 = $1,150 per week

## Step 4: Calculate her annual salary.
Annual salary = 50 weeks × $1,150/week = $57,500

The final answer is: $\\boxed{57500}$"""),
    (18, "7", """Claire eats 3 eggs every morning. In 4 weeks there are 4 × 7 = 28 days.

Eggs eaten = 3 eggs/day × 28 days = 84 eggs

A dozen is 12 eggs, so 84 eggs ÷ 12 eggs/dozen = 7 dozen.

The final answer is 7."""),
    (19, "6", """## Step 1: Calculate the total time for the hike at the average speed.
Total time = 12 miles / 4 miles per hour = 3 hours

## Step 2: Calculate the time and distance so far.
She has walked 4 + 2 = 6 miles in 1 + 1 = 2 hours.

## Step 3: Calculate the remaining distance and time.
Remaining distance = 12 - 6 = 6 miles
Remaining time = 3 - 2 = 1 hour

## Step 4: Calculate the speed needed.
Speed = 6 miles / 1 hour = 6 miles per hour

The final answer is: $\\boxed{6}$"""),
    (20, "15", """Let's break it down:

The orange drink is two-thirds water. After spilling 1 liter, 10 - 1 = 9 liters are left.
Water in the orange drink = 2/3 × 9 = 6 liters

The pineapple drink is three-fifths water:
Water in the pineapple drink = 3/5 × 15 = 9 liters

Total water = 6 + 9 = 15 liters

The final answer is 15."""),
    (21, "14", """Raymond was born 6 years before Samantha, so Raymond is 31 + 6 = 37 years old now.
Raymond had his son at 23, so the son was born 37 - 23 = 14 years ago.

The final answer is 14."""),
    (22, "7", """Billy's first 3 customers buy 1 DVD each: 3 × 1 = 3 DVDs.
His next 2 customers buy 2 DVDs each: 2 × 2 = 4 DVDs.
His last 3 customers buy nothing.

Total DVDs = 3 + 4 = 7

The final answer is 7."""),
    (23, "8", """From 1:00 PM to 5:00 PM the candle burns for 4 hours.
It melts 2 centimeters every hour, so it gets 4 × 2 = 8 centimeters shorter.

The final answer is 8."""),
    (24, "26", """## Step 1: Set up the equation.
Let x be the original price. With a 25% discount Kyle pays 75% of it:
0.75x = 19.50

## Step 2: Solve for x.
x = 19.50 / 0.75 = 26

The final answer is: $\\boxed{26}$"""),
    (25, "2", """Let's add up what Marie paid for everything except the pizza:

* Chicken meal: $12
* Milk: 5 packs × $3/pack = $15
* Apples: 4 apples × $1.50/apple = $6

Total without pizza = $12 + $15 + $6 = $33

Money spent on pizza = $50 - $33 = $17

Number of pizza boxes = $17 ÷ $8.50 per box = 2 boxes

The final answer is 2."""),
    (26, "243", """## Step 1: Calculate the cost of the shorts.
3 pairs x $16.50/pair = $49.50

## Step 2: Calculate the cost of the pants.
3 pairs x $22.50/pair = $67.50

## Step 3: Calculate the cost of the shoes.
3 pairs x $42/pair = $126

## Step 4: Add up all the costs.
$49.50 + $67.50 + $126 = $243

The final answer is: $\\boxed{243}$"""),
    (27, "16", """Cynthia eats 1 serving a night, so in 60 days she eats 60 servings.

Each carton has 15 servings, so she needs:
Cartons = 60 servings / 15 servings per carton
= 4 cartons

Each carton costs $4.00:
Cost = 4 cartons x $4.00/carton
= $16.00

The final answer is 16."""),
    (28, "25", """Henry's second stop was 15 miles before the end of the 60-mile trip, so it was at mile 60 - 15 = 45.
His first stop was at mile 20.
Distance between the stops = 45 - 20 = 25 miles.

The final answer is 25."""),
    (29, "104", """## Step 1: Find the cost of the second pair of heels.
The second pair costs twice as much as the first: 2 × $33 = $66

## Step 2: Find the total cost of the two pairs of heels.
$33 + $66 = $99

## Step 3: Find the cost of the boots.
The heels together cost $5 less than the boots, so the boots cost $99 + $5 = $104.

The final answer is: $\\boxed{104}$"""),
    (30, "109", """The ratio of Darrell's age to Allen's age is 7:11, so the total number of parts is 7 + 11 = 18.

Each part is worth 162 / 18 = 9 years.

Allen's age now = 11 × 9 = 99 years

In 10 years, Allen will be 99 + 10 = 109 years old.

The final answer is 109."""),
    (31, "80", """Let's find each guess:

* The first friend guesses 80.
* The second friend guesses 20 more than half of 80: 80 / 2 + 20 = 40 + 20 = 60
* The third friend guesses 25% more than the first: 80 + 25% of 80 = 80 + 20 = 100

Average guess = (80 + 60 + 100) / 3 = 240 / 3 = 80

The final answer is 80."""),
    (32, "35", """Each dog takes 0.5 hours a day, so 10 dogs take 10 x 0.5 = 5 hours a day.
In a week, he spends 5 hours/day x 7 days = 35 hours.

The final answer is 35."""),
    (33, "70", """Let's say Gretchen has x silver coins. Then she has x + 30 gold coins.

x + (x + 30) = 110
2x + 30 = 110
2x = 80
x = 40

So she has 40 + 30 = 70 gold coins.

The final answer is 70."""),
    (34, "23", """## Step 1: Find half of Raymond's jewels.
Half of Raymond's jewels = 40 / 2 = 20

## Step 2: Find Aaron's jewels.
Aaron's jewels = 20 + 5 = 25

## Step 3: Find Siobhan's jewels.
Siobhan's jewels = 25 - 2 = 23

The final answer is: $\\boxed{23}$"""),
    (35, "9", """In the first 20 minutes, Mike scores 4 points.

In the second 20 minutes he scores 25% more:
25% of 4 = 0.25 × 4 = 1
Second half points = 4 + 1 = 5

Total points = 4 + 5 = 9

The final answer is 9."""),
    (36, "75", """Terry eats 2 yogurts a day, so over 30 days he eats:
2 yogurts/day × 30 days = 60 yogurts

They cost $5.00 for 4 yogurts, so the number of packs is:
60 yogurts ÷ 4 yogurts/pack = 15 packs

Total cost:
15 packs × $5.00/pack = $75.00

The final answer is 75."""),
    (37, "2", """## Step 1: Calculate how much John spent on video games.
8 video games × $20 each = $160

## Step 2: Calculate how much money he got from the lego sets.
He spent $160 and has $5 left, so he got $160 + $5 = $165.

## Step 3: Calculate how many lego sets he sold.
Lego sets sold = $165 / $15 per set = 11 sets

## Step 4: Calculate how many lego sets he still has.
13 - 11 = 2 lego sets

The final answer is: $\\boxed{2}$"""),
    (38, "10", """John runs 3 hours on the first day and half as much, 3 / 2 = 1.5 hours, on each of the other two days.

Total time = 3 + 1.5 + 1.5 = 6 hours

Speed = 60 miles / 6 hours = 10 miles per hour

The final answer is 10."""),
    (39, "18", """Let's break it down step by step:

* Skipping speed = 3 mph, which is half her running speed, so running speed = 3 × 2 = 6 mph.
* Running is four times walking, so walking speed = 6 / 4 = 1.5 mph.
* One-third of 6 hours is running: 1/3 × 6 = 2 hours
* Two-thirds of 6 hours is walking: 2/3 × 6 = 4 hours

Distance running = 2 hours × 6 mph = 12 miles
Distance walking = 4 hours × 1.5 mph = 6 miles

Total distance = 12 + 6 = 18 miles

The final answer is 18."""),
    (40, "8", """Suzy's iPhone is 1 year old.
Ben's iPhone is two times older: 2 × 1 = 2 years old.
Brandon's iPhone is four times as old as Ben's: 4 × 2 = 8 years old.

The final answer is 8."""),
    (41, "200", """## Step 1: Calculate how far Polly can throw with the gemstone.
With the gemstone: 3 × 400 feet = 1200 feet

## Step 2: Calculate how far outside the dragon's reach she can stand.
1200 feet - 1000 feet = 200 feet

The final answer is: $\\boxed{200}$"""),
    (42, "26", """Grandma Jones baked 5 pies with 8 pieces each, so there were 5 × 8 = 40 pieces.
There were 14 pieces left, so the guests took 40 - 14 = 26 pieces.

The final answer is 26."""),
    (43, "48", """## Step 1: Calculate the calories you can still eat.
2000 - 1800 = 200 calories

## Step 2: Calculate the calories per gram.
The bag has 5 servings of 250 calories: 5 × 250 = 1250 calories in 300 grams.
Calories per gram = 1250 / 300 = 4.17 (approximately)

## Step 3: Calculate the grams you can eat.
Each serving is 300 g / 5 = 60 g, and 200 calories is 200 / 250 = 0.8 of a serving.
Grams = 0.8 × 60 g = 48 g

The final answer is: $\\boxed{48}$"""),
    (44, "20", """To make 20 candles Charlie needs 20 / 10 = 2 pounds of beeswax.

Cost of supplies = 2 pounds × $10.00/pound = $20.00

Revenue = 20 candles × $2.00/candle = $40.00

Net profit = Revenue - Cost
= $40.00 - $20.00
= $20.00

The final answer is 20."""),
    (45, "104", """## Step 1: Articles on Monday.
Meredith wrote 5 articles on Monday.

## Step 2: Articles on Tuesday.
She wrote 2/5 times more articles on Tuesday: 2/5 × 5 = 2 more, so 5 + 2 = 7 articles.

## Step 3: Articles on Wednesday.
Twice the number on Tuesday: 2 × 7 = 14 articles.

## Step 4: Total articles and hours.
Total articles = 5 + 7 + 14 = 26
Total hours = 26 articles × 4 hours/article = 104 hours

The final answer is: $\\boxed{104}$"""),
    (46, "163", """Candice started with 80 post-it notes and used 220 at work, and had 23 left.
So she must have had 220 + 23 = 243 post-it notes in total.
The package had 243 - 80 = 163 post-it notes.

The final answer is 163."""),
    (47, "800", """Let's break it down:

Blue ties: $200 / $40 per tie = 5 blue ties
Red ties: twice as many, 2 x 5 = 10 red ties
Price of a red tie: 50% more than $40, so $40 + 0.5 x $40 = $40 + $20 = $60
Cost of red ties: 10 x $60 = $600
Total spent: $200 + $600 = $800

The final answer is 800."""),
    (48, "8", """## Step 1: Convert the length of the wire to inches.
The wire is 4 feet long, and there are 12 inches in a foot, so the wire is $4 \\times 12 = 48$ inches long.

## Step 2: Calculate the number of pieces.
Each piece is 6 inches long, so the number of pieces is $\\frac{48}{6} = 8$.

The final answer is: $\\boxed{8}$"""),
    (49, "30", """## Step 1: Calculate the total number of units in the building.
The building has 15 floors with 8 units each: $15 \\times 8 = 120$ units.

## Step 2: Calculate the number of occupied units.
$\\frac{3}{4} \\times 120 = 90$ units are occupied.

## Step 3: Calculate the number of unoccupied units.
$120 - 90 = 30$ units are unoccupied.

The final answer is: $\\boxed{30}$"""),
    (50, "294", """To find out how much Lloyd makes per week, we need to follow these steps:

1. Calculate the number of dozens of eggs produced per day:
252 eggs ÷ 12 eggs/dozen = 21 dozen

2. Calculate the daily earnings:
21 dozen × \\$2/dozen = \\$42

3. Calculate the weekly earnings:
\\$42/day × 7 days = \\$294

So, Lloyd makes **\\$294** per week.

The final answer is 294."""),
    (51, "5", """Tom sails from 1 PM to 4 PM, which is 3 hours.

Distance traveled = Speed × Time = 10 mph × 3 hours = 30 miles

Time to get back = Distance ÷ Speed = 30 miles ÷ 6 mph = 5 hours

The final answer is 5."""),
    (52, "15", """Step 1: Calculate the weight of the comic books removed.
30 comic books × 1/4 pound = 7.5 pounds

Step 2: Calculate the weight still to remove.
15 pounds - 7.5 pounds = 7.5 pounds

Step 3: Calculate the number of toys.
7.5 pounds ÷ 1/2 pound per toy = 15 toys

The final answer is 15."""),
    (53, "40", """## Step 1: Calculate Thursday's revenue.
Truck tires: 6 × $60 = $360
Car tires: 4 × $40 = $160
Thursday's revenue: $360 + $160 = $520

## Step 2: Calculate Friday's revenue.
Car tires: 12 × $40 = $480

## Step 3: Find the difference.
Thursday had the higher revenue, so the difference is $520 - $480 = $40.

The final answer is: $\\boxed{40}$"""),
    (54, "40", """The family adopted 7 kittens.

Patchy had thrice the number of adopted kittens: 3 × 7 = 21 kittens.

Trixie had 12 kittens.

Total kittens = 7 + 21 + 12 = **40**

The final answer is 40."""),
    (55, "14", """Jean starts with 30 lollipops and eats 2, so she has 30 - 2 = 28 lollipops left.
She puts 2 lollipops in each bag, so she can fill 28 ÷ 2 = 14 bags.

The final answer is 14."""),
    (56, "3", """Each trip to the movies costs Peter a ticket and popcorn, $7 + $7 = $14.
With $42 he can go $42 / $14 = 3 times.

The final answer is 3."""),
    (57, "83", """Let's break it down step by step:

1. The maximum weight the bridge can carry is 5000 pounds.
2. The driver and the empty truck weigh 3755 pounds.
3. The weight left for the boxes is 5000 - 3755 = 1245 pounds.
4. Each box weighs 15 pounds, so the number of boxes is 1245 ÷ 15 = 83.

Therefore, the maximum number of boxes is 83.

The final answer is 83."""),
    (58, "57", """## Step 1: Calculate the 25% fee.
25% of $40.00 = 0.25 × $40.00 = $10.00

## Step 2: Add up all the charges.
Final price = $40.00 + $10.00 + $3.00 + $4.00
= $57.00

The final answer is: $\\boxed{57}$"""),
    (59, "187", """The bush has 6 clusters with 20 fruit each, which gives 120 raspberries in the clusters. Adding the 67 individual fruit, there are 187 raspberries in total.

The final answer is 187."""),
    (60, "17", """## Step 1: Calculate the number of unripe oranges.
20% of 25 oranges = (20/100) × 25 = 5 oranges

## Step 2: Add up the oranges that are not good.
Bad + unripe + sour = 1 + 5 + 2 = 8 oranges

## Step 3: Calculate the number of good oranges.
Good oranges = 25 - 8 = 17

The final answer is: $\\boxed{17}$"""),
    (61, "1430", """Janet pays $500 for the material and $800 for the jeweler, so the brooch costs:
$500 + $800 = $1,300

The insurance is 10% of that:
10% × $1,300 = $130

Total paid:
$1,300 + $130 = $1,430

The final answer is 1430."""),

]

LINES = [
    # units inside the expression
    ("20 miles/day × 5 days = 100 miles", (1, 1)),
    ("3 hours x $35/hour = $105", (1, 1)),
    ("9 eggs/day * $2/egg = $18/day", (1, 1)),
    ("9 eggs/day * $2/egg = $20/day", (0, 1)),
    ("Teaching: 35 hours/week × $20/hour = $700/week", (1, 1)),
    ("12 miles / 4 miles per hour = 3 hours", (1, 1)),
    ("$17 ÷ $8.50 per box = 2 boxes", (1, 1)),
    ("2 hours × 6 mph = 12 miles", (1, 1)),
    ("2 hours × 6 mph = 14 miles", (0, 1)),
    ("80 GB / 2 GB/minute = 40 minutes", (1, 1)),
    ("16 eggs - 3 eggs - 4 eggs = 9 eggs", (1, 1)),
    ("So 200 * .55 = 110 pounds more salmon than trout were caught.", (1, 1)),  # a unit is at most 3 words
    ("So 200 * .55 = 100 pounds more salmon than trout were caught.", (0, 1)),
    # a name or label on the left, whose numbers are not operands
    ("Cost = 6 x $2.50 = $15", (1, 1)),
    ("Cost = 6 x $2.50 = $16", (0, 1)),
    ("Number of packages of 3 = 18 / 3 = 6", (1, 1)),
    ("Cost of 3 apples = 3 x $2 = $6", (1, 1)),
    ("Day 2 = 15 + 5 = 20 pages", (1, 1)),
    ("Step 2: 15 + 5 = 20", (1, 1)),
    ("**Total cost** = $204 + $160 + $330 = $694", (1, 1)),
    ("**Total cost** = $204 + $160 + $330 = $684", (0, 1)),
    ("* Donuts: 3 dozen x $68/dozen = $204", (1, 1)),
    ("Overtime hours = 45 - 40 = 5 hours", (1, 1)),
    ("2 hours = 2 x 60 = 120 minutes", (1, 1)),  # `2 hours = 120 minutes` is a conversion, not a sum
    # percentages and fractions in words
    ("30% of $9000 = 0.30 x $9000 = $2700", (2, 2)),
    ("30% of $9000 = 0.30 x $9000 = $270", (1, 2)),
    ("1/3 × 90 = 30", (1, 1)),
    ("2/3 × 9 = 6 liters", (1, 1)),
    ("(12 / 20) x 100% = 60%", (1, 1)),
    ("25% of 16 = 0.25 x 16 = 4 students", (2, 2)),
    ("Start = 12 ÷ (2/3) = 18", (1, 1)),
    ("Sale price = $50 - 10% = $45", (1, 1)),  # a 10% discount, as people write it
    ("Sale price = $50 - 10% = $44", (0, 1)),
    # a running total: the next operation written after the result
    ("Total = 2 x 3 = 6 cups/day x 7 days = 42 cups", (2, 2)),
    ("Total = 2 x 3 = 7 cups/day x 7 days = 49 cups", (1, 2)),
    # chains over lines that start with `=`
    ("Turtle's speed = Cat's speed / 5\nTurtle's speed = 15 / 5\n= 3 feet/second", (1, 1)),
    ("Turtle's speed = 15 / 5\n= 4 feet/second", (0, 1)),
    ("Net profit = Revenue - Cost\n= $40.00 - $20.00\n= $20.00", (1, 1)),
    ("Cost = 4 cartons x $4.00/carton\n= $16.00", (1, 1)),
    ("Cost = 4 cartons x $4.00/carton\n= $18.00", (0, 1)),
    # LaTeX and markdown
    ("$\\frac{1}{3} \\times 90 = 30$", (1, 1)),
    ("$20 \\times 5 = 100$ miles", (1, 1)),
    ("$$16 - 3 - 4 = 9$$", (1, 1)),
    ("**Step 1:** 3 + 4 = 7 eggs", (1, 1)),
    # algebra: unknowns are not arithmetic to check
    ("6 * (50x) = 1800", (0, 0)),
    ("300x = 1800", (0, 0)),
    ("2x + 30 = 110", (0, 0)),
    ("x + (x + 30) = 110", (0, 0)),
    ("Let P be the price. P - 0.25P = $19.50", (0, 0)),
    ("x = 19.50 / 0.75 = 26", (1, 1)),
    ("Total = price x quantity = $5 x 3 = $15", (1, 1)),
    # prose with no step
    ("From 1:00 PM to 5:00 PM is 4 hours.", (0, 0)),
    ("The ratio is 7:11, so the total is 18 parts.", (0, 0)),
    # a label repeated down the lines, one chain (the earlier line has no result of its own)
    ("Time = 150 miles / 75 mph\nTime = 2 hours", (1, 1)),
    ("Time = 150 miles / 75 mph\nTime = 3 hours", (0, 1)),
    ("Perimeter = 2(1.5) + 2(6)\nPerimeter = 3 + 12\nPerimeter = 15 miles", (2, 2)),
    ("Perimeter = 2(1.5) + 2(6)\nPerimeter = 3 + 13\nPerimeter = 16 miles", (1, 2)),
    ("Total = 5 + 3 = 8\nTotal = 8 * 2 = 16", (2, 2)),  # each line its own chain: not joined
    ("Speed = 60 miles/hour\nSpeed = 1 mile/minute", (0, 0)),  # a unit change, not a step
    # implicit multiplication, parts in words
    ("Area = 4(2.5) = 10 square feet", (1, 1)),
    ("Half of 10 is 5.", (1, 1)),
    ("Half of 10 is 6.", (0, 1)),
    ("A third of $12 is $4.", (1, 1)),
    ("Twice 12 is 24 cookies.", (1, 1)),
]
